"""Looking into merges (front end): ``analyze`` before a merge, ``report`` after
one, and the text/HTML renderer both share. Imports ``core`` and ``io`` only.
"""
