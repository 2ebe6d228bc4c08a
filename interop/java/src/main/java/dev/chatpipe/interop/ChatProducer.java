package dev.chatpipe.interop;

import java.time.Instant;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;
import org.springframework.kafka.core.DefaultKafkaProducerFactory;
import org.springframework.kafka.core.KafkaTemplate;
import org.springframework.kafka.support.SendResult;
import org.springframework.kafka.support.serializer.JacksonJsonSerializer;
import org.springframework.kafka.support.serializer.JsonSerializer;

/**
 * Sends a chat request or a cancel the way a Spring {@link KafkaTemplate} does by default: the
 * value serializer is Spring's JSON serializer with no settings changed, so the values carry
 * Java property names (camelCase), a {@code __TypeId__} header with the class name, and dates as
 * that Jackson writes them (Jackson 2 + JavaTimeModule: numeric seconds.nanos; Jackson 3: ISO-8601).
 *
 * <pre>
 * ChatProducer BOOTSTRAP TOPIC_PREFIX request SESSION_ID MESSAGE_ID [--user U] [--text T]
 *              [--null-created-at] [--jackson 2|3]
 * ChatProducer BOOTSTRAP TOPIC_PREFIX cancel  SESSION_ID MESSAGE_ID [--jackson 2|3]
 * ChatProducer BOOTSTRAP TOPIC_PREFIX session-cancel SESSION_ID [--jackson 2|3]
 * </pre>
 *
 * {@code --jackson 2} (default) uses {@code JsonSerializer} (Jackson 2, deprecated in Spring
 * Kafka 4), {@code --jackson 3} uses {@code JacksonJsonSerializer}. Prints one JSON line per
 * record sent: topic, partition, offset, key, headers.
 */
public final class ChatProducer {

    private ChatProducer() {}

    public static void main(String[] argv) throws Exception {
        Args args = new Args(argv, Set.of("null-created-at"));
        String bootstrap = args.at(0, "bootstrap servers");
        String prefix = args.at(1, "topic prefix");
        String command = args.at(2, "command (request|cancel|session-cancel)");
        String sessionId = args.at(3, "session id");
        int jackson = Args.jackson(args);

        String topic;
        String key;
        Object value;
        switch (command) {
            case "request" -> {
                String messageId = args.at(4, "message id");
                topic = prefix + "chat.requests";
                key = sessionId;
                Instant createdAt = args.flag("null-created-at") ? null : Instant.now();
                value = new ChatRequest(
                        messageId,
                        sessionId,
                        args.get("user", "java-user"),
                        args.get("text", "hello from Spring"),
                        createdAt);
            }
            case "cancel" -> {
                topic = prefix + "chat.cancels";
                ChatCancel cancel = new ChatCancel(sessionId, args.at(4, "message id"), Instant.now());
                key = cancel.kafkaKey();
                value = cancel;
            }
            case "session-cancel" -> {
                topic = prefix + "chat.cancels";
                ChatSessionCancel cancel = new ChatSessionCancel(sessionId, Instant.now());
                key = cancel.kafkaKey();
                value = cancel;
            }
            default -> throw new IllegalArgumentException(
                    "command is request, cancel or session-cancel, not " + command);
        }

        Map<String, Object> props = new HashMap<>();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ProducerConfig.CLIENT_ID_CONFIG, "chatpipe-interop-producer");
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
        props.put(
                ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG,
                jackson == 3 ? JacksonJsonSerializer.class : JsonSerializer.class);

        DefaultKafkaProducerFactory<String, Object> factory = new DefaultKafkaProducerFactory<>(props);
        try {
            KafkaTemplate<String, Object> template = new KafkaTemplate<>(factory);
            SendResult<String, Object> sent = template.send(topic, key, value).get(30, TimeUnit.SECONDS);
            ProducerRecord<String, Object> record = sent.getProducerRecord();
            Map<String, Object> out = new LinkedHashMap<>();
            out.put("sent", command);
            out.put("serializer", jackson == 3 ? JacksonJsonSerializer.class.getName() : JsonSerializer.class.getName());
            out.put("topic", sent.getRecordMetadata().topic());
            out.put("partition", sent.getRecordMetadata().partition());
            out.put("offset", sent.getRecordMetadata().offset());
            out.put("key", record.key());
            out.put("headers", Json.headers(record.headers()));
            out.put("javaClass", value.getClass().getName());
            Json.line(out);
        } finally {
            factory.destroy();
        }
    }
}
