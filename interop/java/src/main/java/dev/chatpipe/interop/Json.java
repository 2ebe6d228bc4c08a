package dev.chatpipe.interop;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.SerializationFeature;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.Headers;

/** One JSON object per stdout line (the tests read these); never the serializers under test. */
final class Json {
    private static final ObjectMapper PRINTER =
            new ObjectMapper().disable(SerializationFeature.FAIL_ON_EMPTY_BEANS);
    private static final PrintStream OUT =
            new PrintStream(System.out, true, StandardCharsets.UTF_8);

    private Json() {}

    static synchronized void line(Map<String, ?> value) {
        try {
            OUT.println(PRINTER.writeValueAsString(value));
        } catch (JsonProcessingException e) {
            throw new IllegalStateException(e);
        }
        OUT.flush();
    }

    /** Headers as text; Spring's binary deserialization-exception headers are left out. */
    static Map<String, String> headers(Headers headers) {
        Map<String, String> out = new LinkedHashMap<>();
        for (Header h : headers) {
            if (h.key().startsWith("springDeserializerException")) {
                continue;
            }
            out.put(h.key(), h.value() == null ? null : new String(h.value(), StandardCharsets.UTF_8));
        }
        return out;
    }
}
