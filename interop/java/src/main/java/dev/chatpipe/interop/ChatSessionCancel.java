package dev.chatpipe.interop;

import java.time.Instant;

/**
 * A {@code chat.session_cancel} ("stop all", contract 1.4.0) as a Spring team writes it. Unlike
 * a request or a cancel, its {@code type} property is required: it is what tells a session's
 * cancel from a message's on {@code chat.cancels}.
 *
 * <p>Key on the compacted {@code chat.cancels}: {@code part(sessionId)} alone (no {@code :}, so
 * it never shares a key with a message's cancel). Every message of the session created before
 * {@code requestedAt} is cancelled, also those no ai_consumer has fetched yet.
 */
public record ChatSessionCancel(String type, String sessionId, Instant requestedAt) {

    public static final String TYPE = "chat.session_cancel";

    public ChatSessionCancel(String sessionId, Instant requestedAt) {
        this(TYPE, sessionId, requestedAt);
    }

    public String kafkaKey() {
        return ChatCancel.part(sessionId);
    }
}
