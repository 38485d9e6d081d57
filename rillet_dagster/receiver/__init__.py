"""The Rillet webhook receiver: verify, store durably in the queue, then acknowledge."""

from rillet_dagster.receiver.app import ReceiverConfig, create_app

__all__ = ["ReceiverConfig", "create_app"]
