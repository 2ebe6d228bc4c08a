"""Broadcast reader of the compacted chat.cancels topic, mirroring cancels into Redis flags."""
