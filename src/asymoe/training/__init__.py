"""Lightning wrappers: module, callbacks, run orchestration."""
