"""Step 4 of a request: the images written as files with their generation metadata (outputs), in
AUTOMATIC1111's infotext format among others (infotext)."""
