"""The ground of the layers: names every package shares (config errors, cells and their names, the batch layouts,
atomic writes) without importing each other. Imports nothing of the project."""
