"""The patch re-scorer head family (family.py): stage one's second look at candidates or a grid."""
