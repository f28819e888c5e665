"""The guest agent: monitors, local recovery, outbox, boot check and control API, on the core alone."""
