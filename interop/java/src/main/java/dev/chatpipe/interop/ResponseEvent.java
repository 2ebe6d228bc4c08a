package dev.chatpipe.interop;

import com.fasterxml.jackson.annotation.JsonProperty;
import java.time.Instant;
import java.util.Set;

/**
 * Every event chatpipe writes to {@code chat.responses} ({@code chat.started}, {@code chat.chunk},
 * {@code chat.completed}, {@code chat.cancelled}, {@code chat.failed}) read into one class, the
 * consumer's default type. chatpipe writes snake_case, so every component names its JSON
 * property: Spring's mappers ignore unknown properties, and a missing {@code @JsonProperty}
 * would leave the field null without any error.
 *
 * <p>{@code com.fasterxml.jackson.annotation} is shared by Jackson 2 and Jackson 3.
 */
public record ResponseEvent(
        @JsonProperty("schema_version") Integer schemaVersion,
        @JsonProperty("type") String type,
        @JsonProperty("message_id") String messageId,
        @JsonProperty("session_id") String sessionId,
        @JsonProperty("seq") Long seq,
        @JsonProperty("instance_id") String instanceId,
        @JsonProperty("at") Instant at,
        @JsonProperty("delta") String delta,
        @JsonProperty("reason") String reason,
        @JsonProperty("usage") Usage usage,
        @JsonProperty("restart") Boolean restart) {

    /** {@code usage} on terminal events. */
    public record Usage(
            @JsonProperty("completion_tokens") Integer completionTokens,
            @JsonProperty("chunks") Integer chunks,
            @JsonProperty("prompt_tokens") Integer promptTokens) {}  // since contract 1.5.0

    static final Set<String> TERMINAL = Set.of("chat.completed", "chat.cancelled", "chat.failed");

    static boolean isTerminal(ResponseEvent event) {
        return TERMINAL.contains(event.type());
    }
}
