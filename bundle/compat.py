"""Standard-library gaps on older Pythons (Jetson's JetPack 6 ships Python 3.10)."""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["tomllib"]
