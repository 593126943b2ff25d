"""Local servers that tests start on free 127.0.0.1 ports (emulators and helpers)."""
