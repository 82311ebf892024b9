"""What keeps a session safe beyond the guard's own process (the watchdog)."""
