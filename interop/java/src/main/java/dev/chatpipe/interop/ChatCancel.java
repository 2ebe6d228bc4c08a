package dev.chatpipe.interop;

import java.time.Instant;

/**
 * A {@code chat.cancel} as a Spring team writes it.
 *
 * <p>Key on the compacted {@code chat.cancels}: {@code part(sessionId) + ":" + part(messageId)},
 * where each id has {@code %} written {@code %25} and {@code :} written {@code %3A} (contract
 * 1.2.0), so that two (session, message) pairs never share a key. chatpipe tombstones that key
 * once the message is final; a compacted topic rejects a null key.
 */
public record ChatCancel(String sessionId, String messageId, Instant requestedAt) {

    public String kafkaKey() {
        return part(sessionId) + ":" + part(messageId);
    }

    static String part(String id) {
        return id.replace("%", "%25").replace(":", "%3A");
    }
}
