"""Imagery in: the map GeoTIFF (geo), the procedural world, Earth Engine, the fetch stage, the split function and the tile stage."""
