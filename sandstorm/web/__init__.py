"""The web layer: translates HTTP and WebSocket to actor calls and owns no tasks of its own."""
