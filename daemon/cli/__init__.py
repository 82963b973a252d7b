"""The `corral` command line: its verbs (main), interactive `run`, what both print (output),
`corral doctor`."""
