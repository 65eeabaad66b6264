"""Paths to peers: UDP, DERP, disco (see conn.py for the driver)."""
