"""STAC Items as raster sources: read an Item, turn asset keys into GDAL-readable paths.

A source may be given as an Item and asset keys, ``"item.json#B04,B03,B02"``: the
assets' rasters are stacked as bands in that order (:class:`terrapatch.raster.Source`
does the stacking and checks that the assets share one grid). The Item is a local
JSON file or an ``http(s)://`` URL; it is recognised by the ``.json`` (or
``.geojson``) ending of its path, or by a ``stac:`` prefix for Item URLs without one
(``"stac:https://host/collections/c/items/id#B04"``). Relative asset hrefs are
resolved against the Item's own location, and the hrefs are made GDAL-readable
(``https://…`` → ``/vsicurl/https://…``, ``s3://…`` → ``/vsis3/…``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from terrapatch.errors import InputError, MissingInputError
from terrapatch.raster import gdal_path, shown_path

if TYPE_CHECKING:
    import pystac

#: Seconds to wait for an Item JSON fetched over HTTP.
ITEM_TIMEOUT = 30.0


@dataclass(frozen=True)
class StacAsset:
    """One asset of an Item, ready to open.

    Attributes
    ----------
    key
        The asset key (``"B04"``).
    path
        Its raster as GDAL reads it (absolute local path, ``/vsicurl/…``, ``/vsis3/…``).
    item
        Where the Item was read (its self href), or its id when it has none.
    """

    key: str
    path: str
    item: str

    @property
    def label(self) -> str:
        """How error messages name the asset: ``asset 'B04' of STAC item '…'``."""
        return f"asset {self.key!r} of STAC item {self.item!r}"


def split_keys(text: str, parameter: str = "source1") -> list[str]:
    """Asset keys of a comma-separated list (``"B04, B03"`` → ``["B04", "B03"]``).

    Raises
    ------
    InputError
        If the list names no key.
    """
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise InputError(f"{parameter}: no STAC asset key after '#' (expected "
                         "'item.json#KEY1,KEY2')")
    return keys


def _fetch(href: str, parameter: str) -> tuple[str, str]:
    """``(absolute href, text)`` of an Item JSON file or URL."""
    url = shown_path(href)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=ITEM_TIMEOUT) as response:
                return url, response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            raise InputError(f"{parameter}: cannot read STAC item {url!r} "
                             f"(HTTP {exc.code} {exc.reason})") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"{parameter}: cannot read STAC item {url!r} ({reason})") \
                from None
    if scheme == "file":
        url = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    elif len(scheme) > 1 or url.startswith("/vsi"):
        raise InputError(f"{parameter}: cannot read STAC item {url!r}: give the Item as a "
                         "local file or an http(s) URL (its assets may be anywhere GDAL "
                         "reads, s3:// included)")
    path = Path(url).absolute()
    if not path.is_file():
        raise MissingInputError(f"{parameter}: STAC item {os.fspath(path)!r} does not exist")
    try:
        return os.fspath(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{parameter}: cannot read STAC item {os.fspath(path)!r} ({exc})") \
            from None


def read_item(item: str | os.PathLike[str], parameter: str = "source1") -> pystac.Item:
    """Read a STAC Item from a local JSON file or an ``http(s)://`` URL.

    Parameters
    ----------
    item
        Path or URL of the Item JSON (``/vsicurl/https://…`` is accepted too).
    parameter
        Neutral identifier named in error messages (``source1``).

    Returns
    -------
    pystac.Item
        The Item, its self href set to where it was read (for relative asset hrefs).

    Raises
    ------
    MissingInputError
        If a local file does not exist.
    InputError
        If the Item cannot be fetched or parsed, or the JSON is not a STAC Item.
    """
    import pystac

    href, text = _fetch(os.fspath(item), parameter)
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{parameter}: STAC item {href!r} is not valid JSON ({exc})") from None
    kind = data.get("type") if isinstance(data, dict) else type(data).__name__
    if kind != "Feature" or "assets" not in data:
        raise InputError(f"{parameter}: {href!r} is not a STAC Item (type {kind!r}; expected "
                         "a 'Feature' with 'assets')")
    try:
        return pystac.Item.from_dict(data, href=href, preserve_dict=False)
    except (pystac.STACError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{parameter}: {href!r} is not a valid STAC Item ({exc})") from None


def resolve_assets(item: pystac.Item | str | os.PathLike[str], keys: Sequence[str],
                   parameter: str = "source1") -> list[StacAsset]:
    """The assets ``keys`` of ``item``, in that order, with GDAL-readable paths.

    Parameters
    ----------
    item
        A ``pystac.Item``, or the path or URL of an Item JSON file.
    keys
        Asset keys.
    parameter
        Neutral identifier named in error messages (``source1``).

    Returns
    -------
    list of StacAsset
        One per key.

    Raises
    ------
    InputError
        If a key is not an asset of the Item (the message lists the available keys), or
        an asset's href is relative and the Item has no location to resolve it against.
    """
    import pystac
    from pystac.utils import is_absolute_href, make_absolute_href

    loaded = item if isinstance(item, pystac.Item) else read_item(item, parameter)
    where = loaded.get_self_href()
    name = repr(where or loaded.id)
    if not keys:
        raise InputError(f"{parameter}: no asset key given for STAC item {name}; available "
                         f"assets: {', '.join(loaded.assets) or '(none)'}")
    resolved = []
    for key in keys:
        asset = loaded.assets.get(key)
        if asset is None:
            raise InputError(f"{parameter}: STAC item {name} has no asset {key!r}; available "
                             f"assets: {', '.join(loaded.assets) or '(none)'}")
        href = asset.href
        if not is_absolute_href(href):
            if where is None:
                raise InputError(f"{parameter}: asset {key!r} of STAC item {name} has the "
                                 f"relative href {href!r} and the Item has no self href to "
                                 "resolve it against")
            href = make_absolute_href(href, where)
        resolved.append(StacAsset(key, gdal_path(href), where or loaded.id))
    return resolved


def item_asset_paths(item: pystac.Item | str | os.PathLike[str], keys: Sequence[str],
                     parameter: str = "source1") -> list[str]:
    """GDAL-readable paths of the assets ``keys`` of a STAC Item, in that order.

    Parameters
    ----------
    item
        A ``pystac.Item``, or the path or URL of an Item JSON file.
    keys
        Asset keys.
    parameter
        Parameter named in error messages.

    Returns
    -------
    list of str
        Paths to give :class:`terrapatch.raster.Source` or ``rasterio.open``.

    Raises
    ------
    InputError
        As :func:`resolve_assets`.
    """
    return [a.path for a in resolve_assets(item, keys, parameter)]
