"""nxdt-mixtral: the mixtral family.

The presets live in hub_registry.toml; the model implementation arrives with its own issue, so
this plugin registers no ModelSpec yet and its presets show as "model not installed".
"""
