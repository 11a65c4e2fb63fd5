"""Shared test settings: markers are declared in pyproject.toml; tests import the installed
package (no sys.path changes)."""
