"""Binary codes: sign, pack, Hamming distance, and the codes file."""
