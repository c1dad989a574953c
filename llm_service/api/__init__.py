"""HTTP surfaces of the service, one module each."""
