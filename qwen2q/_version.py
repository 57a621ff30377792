"""The package version, in a module of its own so that any module can import it without importing the
package root (whose lazy entry points reach every layer)."""
__version__ = "0.1.0"
