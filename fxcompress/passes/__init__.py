"""The compiler passes: each a function from one typed value (see ``fxcompress.ir``) to the next."""
