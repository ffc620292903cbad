"""nxdt-llama plugin package."""
