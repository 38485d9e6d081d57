"""The Rillet sandbox simulator: a local, faithful stand-in for the Rillet API."""
