from zimage.cli.main import entry

entry()
