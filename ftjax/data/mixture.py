"""`data.mixture`: several prepared directories mixed by weight."""

from ftjax.errors import ConfigError


def parse_mixture(text):
  """[(directory, weight)] of a `data.mixture` string "dirA:0.7,dirB:0.3" (weights normalised)."""
  items = []
  for item in text.split(","):
    path, sep, weight = item.strip().rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not (sep and path and value > 0):
      raise ConfigError("data.mixture", "expected 'dir:weight,dir:weight' with weights > 0, "
                        f"got item {item!r}")
    items.append((path, value))
  total = sum(w for _, w in items)
  return [(path, w / total) for path, w in items]
