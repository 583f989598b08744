"""Programs a user runs beside the scripts: demo, report, export, convert_weights, gpu_check."""
