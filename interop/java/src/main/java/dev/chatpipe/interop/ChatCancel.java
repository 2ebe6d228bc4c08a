package dev.chatpipe.interop;

import java.time.Instant;

/**
 * A {@code chat.cancel} as a Spring team writes it.
 *
 * <p>Key on the compacted {@code chat.cancels}: {@code sessionId + ":" + messageId} (chatpipe
 * tombstones that key once the message is final; a compacted topic rejects a null key).
 */
public record ChatCancel(String sessionId, String messageId, Instant requestedAt) {

    public String kafkaKey() {
        return sessionId + ":" + messageId;
    }
}
