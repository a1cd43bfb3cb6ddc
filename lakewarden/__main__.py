from lakewarden.cli import run

run()
