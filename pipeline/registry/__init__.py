"""The registered model: its pyfunc package, and promotion under the champion alias."""
