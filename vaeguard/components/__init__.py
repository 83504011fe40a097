"""Built-in parts, registered through the same pluggy hooks as third-party plugins."""
