"""The errors cityops raises on purpose, in one place.

``ConfigError`` is bad configuration caught at start: a missing program, a port in use,
a state folder from another Kafka cluster, a topic that does not exist. Its message is
one line that names the cause and the fix; the CLI prints it without a traceback and
exits non-zero, so an operator never has to read a stack trace to fix a setting.
"""

from __future__ import annotations


class ConfigError(RuntimeError):
    """Bad configuration found at start; the message says what is wrong and what to do."""


class MissingTopics(ConfigError):
    """A Kafka topic a service needs does not exist (topics are never auto-created)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        names = ", ".join(sorted(topics))
        super().__init__(
            f"kafka at {bootstrap} has no topic {names}: run `cityops stack up` locally, "
            f"or create it in production (deploy/compose, deploy/kubernetes create them)")
        self.topics = topics
