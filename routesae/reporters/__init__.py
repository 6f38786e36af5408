"""Built-in run reporters."""
