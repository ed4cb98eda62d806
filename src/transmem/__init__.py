"""transmem: unsupervised transfer learning between spatiotemporal prediction tasks."""
__version__ = "0.1.0"
