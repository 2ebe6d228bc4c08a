package dev.chatpipe.interop;

import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.kafka.clients.consumer.Consumer;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.springframework.core.log.LogAccessor;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.support.serializer.DeserializationException;
import org.springframework.kafka.support.serializer.ErrorHandlingDeserializer;
import org.springframework.kafka.support.serializer.JacksonJsonDeserializer;
import org.springframework.kafka.support.serializer.JsonDeserializer;
import org.springframework.kafka.support.serializer.SerializationUtils;

/**
 * Reads {@code chat.responses} the way a Spring consumer is configured for it: values through
 * {@link ErrorHandlingDeserializer} delegating to Spring's JSON deserializer with
 * {@code spring.json.value.default.type = ResponseEvent} (chatpipe sends no {@code __TypeId__}).
 *
 * <pre>
 * ResponseConsumer BOOTSTRAP TOPIC_PREFIX MESSAGE_ID[,MESSAGE_ID...] [--timeout-s 30]
 *                  [--jackson 2|3] [--all]
 * </pre>
 *
 * Reads every partition from the beginning (no consumer group) and prints one JSON line per
 * event of the given message ids ({@code --all}: of any message) with the fields as the Java
 * object holds them, and one {@code {"error": ...}} line per record that did not deserialise.
 * Exits 0 once every id has had a terminal event, 3 on timeout, 4 when any record failed.
 */
public final class ResponseConsumer {

    private static final LogAccessor LOG = new LogAccessor(ResponseConsumer.class);

    private ResponseConsumer() {}

    public static void main(String[] argv) {
        Args args = new Args(argv, Set.of("all"));
        String bootstrap = args.at(0, "bootstrap servers");
        String prefix = args.at(1, "topic prefix");
        Set<String> wanted = new LinkedHashSet<>(Arrays.asList(args.at(2, "message id(s)").split(",")));
        long timeoutMs = (long) (Double.parseDouble(args.get("timeout-s", "30")) * 1000);
        boolean all = args.flag("all");
        int jackson = Args.jackson(args);
        String topic = prefix + "chat.responses";

        Map<String, Object> props = new HashMap<>();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.CLIENT_ID_CONFIG, "chatpipe-interop-consumer");
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ErrorHandlingDeserializer.class);
        props.put(
                ErrorHandlingDeserializer.VALUE_DESERIALIZER_CLASS,
                jackson == 3 ? JacksonJsonDeserializer.class : JsonDeserializer.class);
        // the same key for both ("spring.json.value.default.type")
        props.put(JsonDeserializer.VALUE_DEFAULT_TYPE, ResponseEvent.class.getName());

        DefaultKafkaConsumerFactory<String, ResponseEvent> factory = new DefaultKafkaConsumerFactory<>(props);
        Set<String> finished = new LinkedHashSet<>();
        int errors = 0;
        int code = 0;
        try (Consumer<String, ResponseEvent> consumer = factory.createConsumer()) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo p : consumer.partitionsFor(topic, Duration.ofSeconds(10))) {
                parts.add(new TopicPartition(p.topic(), p.partition()));
            }
            if (parts.isEmpty()) {
                System.err.println("no partitions for " + topic);
                System.exit(2);
            }
            consumer.assign(parts);
            consumer.seekToBeginning(parts);
            System.err.println("reading " + topic + " (" + parts.size() + " partitions) for " + wanted);

            long deadline = System.currentTimeMillis() + timeoutMs;
            while (!finished.containsAll(wanted)) {
                long left = deadline - System.currentTimeMillis();
                if (left <= 0) {
                    Set<String> missing = new LinkedHashSet<>(wanted);
                    missing.removeAll(finished);
                    System.err.println("timeout: no terminal event for " + missing);
                    code = 3;
                    break;
                }
                ConsumerRecords<String, ResponseEvent> records =
                        consumer.poll(Duration.ofMillis(Math.min(left, 200)));
                for (ConsumerRecord<String, ResponseEvent> record : records) {
                    ResponseEvent event = record.value();
                    if (event == null) {
                        errors++;
                        Json.line(error(record));
                        continue;
                    }
                    if (!all && !wanted.contains(event.messageId())) {
                        continue;
                    }
                    Json.line(describe(record, event));
                    if (ResponseEvent.isTerminal(event)) {
                        finished.add(event.messageId());
                    }
                }
            }
        }
        System.exit(code != 0 ? code : errors > 0 ? 4 : 0);
    }

    private static Map<String, Object> describe(ConsumerRecord<String, ResponseEvent> record, ResponseEvent e) {
        Map<String, Object> ev = new LinkedHashMap<>();
        ev.put("schemaVersion", e.schemaVersion());
        ev.put("type", e.type());
        ev.put("messageId", e.messageId());
        ev.put("sessionId", e.sessionId());
        ev.put("seq", e.seq());
        ev.put("instanceId", e.instanceId());
        ev.put("at", e.at() == null ? null : e.at().toString());
        ev.put("atEpochNanos", e.at() == null ? null : e.at().getEpochSecond() * 1_000_000_000L + e.at().getNano());
        ev.put("delta", e.delta());
        ev.put("reason", e.reason());
        if (e.usage() == null) {
            ev.put("usage", null);
        } else {
            Map<String, Object> usage = new LinkedHashMap<>();
            usage.put("completionTokens", e.usage().completionTokens());
            usage.put("chunks", e.usage().chunks());
            if (e.usage().promptTokens() != null) usage.put("promptTokens", e.usage().promptTokens());
            ev.put("usage", usage);
        }
        ev.put("restart", e.restart());

        Map<String, Object> out = new LinkedHashMap<>();
        out.put("topic", record.topic());
        out.put("partition", record.partition());
        out.put("offset", record.offset());
        out.put("key", record.key());
        out.put("headers", Json.headers(record.headers()));
        out.put("javaClass", e.getClass().getName());
        out.put("event", ev);
        return out;
    }

    private static Map<String, Object> error(ConsumerRecord<String, ResponseEvent> record) {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("topic", record.topic());
        out.put("partition", record.partition());
        out.put("offset", record.offset());
        out.put("key", record.key());
        out.put("headers", Json.headers(record.headers()));
        DeserializationException ex = SerializationUtils.getExceptionFromHeader(
                record, SerializationUtils.VALUE_DESERIALIZER_EXCEPTION_HEADER, LOG);
        if (ex == null) {
            out.put("error", "null value (tombstone) on " + record.topic());
        } else {
            Throwable cause = ex.getCause() == null ? ex : ex.getCause();
            out.put("error", cause.getClass().getName() + ": " + cause.getMessage());
            out.put("data", ex.getData() == null ? null : new String(ex.getData(), java.nio.charset.StandardCharsets.UTF_8));
        }
        return out;
    }
}
