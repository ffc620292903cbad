"""nxdt-bert plugin package."""
