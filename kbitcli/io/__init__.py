"""The I/O layer, which knows no format: the dtype table (dtypes.py), the folder reader (folder.py), the folder
writer (writer.py) over one atomic output (atomic.py), the manifest (manifest.py), streamed safetensors files
(safetensors_stream.py) and the calibration spill (spill.py). Every format in formats/ reads and writes through it,
so each guarantee (paths kept inside the folder, all-or-nothing output, every file listed in the manifest) is
made once."""
