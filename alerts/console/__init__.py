"""The operators' web console and REST API (``cityops console``)."""
