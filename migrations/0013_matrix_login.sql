-- Matrix (issue 18): the access token is kept with the device id, so a restart reuses the
-- login instead of making a new token (the password is used only when the token is refused).
-- With end-to-end encryption, the crypto store on disk belongs to this (account, device).
ALTER TABLE matrix_state ADD COLUMN access_token text;
