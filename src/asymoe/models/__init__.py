"""Model components: plain nn.Modules, no Lightning."""
