"""The real-time executor: the runner, its pacing and capacity, shared limits, hedging,
retries, and the transport that talks HTTP."""
