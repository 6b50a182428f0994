"""Placeholder; filled in below."""


def add_arguments(p):
    pass


def main(args):
    return 1
