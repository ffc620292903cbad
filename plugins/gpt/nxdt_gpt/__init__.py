"""nxdt-gpt plugin package."""
