from perfmodel.cli.app import run

run()
