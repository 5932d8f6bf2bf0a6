"""The few names that the lower packages (lightning_modules, datamodules, callbacks) share without importing each other."""
