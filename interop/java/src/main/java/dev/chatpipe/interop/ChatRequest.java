package dev.chatpipe.interop;

import java.time.Instant;

/**
 * A {@code chat.request} as a Spring team writes it: Java property names (camelCase) and an
 * {@link Instant}, serialized by Spring's JSON serializer with its default settings. There is
 * no {@code schemaVersion} or {@code type} property: chatpipe reads their absence as version 1
 * and {@code chat.request}.
 *
 * <p>Key on {@code chat.requests}: {@code sessionId} (per-session order depends on it).
 */
public record ChatRequest(
        String messageId, String sessionId, String userId, String message, Instant createdAt) {}
