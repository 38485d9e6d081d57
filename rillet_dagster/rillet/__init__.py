"""Talking to Rillet: the client, its errors, money, the shared rate budget and signatures."""
