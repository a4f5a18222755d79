"""The job folder as durable state: settings, lock, journal, durable writes, outputs, shards.

Both executors write through here; nothing here knows how a request is sent.
"""
