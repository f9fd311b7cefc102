"""ptycho_ml: physics-informed neural-network ptychographic reconstruction on MLflow."""

__version__ = "0.1.0"
