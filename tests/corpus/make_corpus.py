"""Writes the MIME test corpus (``*.eml``) beside this script, deterministically.

Run ``python tests/corpus/make_corpus.py`` after editing a message; the .eml
files are committed so a test never depends on running this. Every identity and
every clinical detail here is fictitious; INS values use the test OID
1.2.250.1.213.1.4.10. Messages are written with CRLF line endings, except
``bare_lf.eml``, which exists to test bare LF.
"""

from __future__ import annotations

import base64
from pathlib import Path

HERE = Path(__file__).parent

FAKE_PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n" * 3
FAKE_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02" * 2
FAKE_ZIP = b"PK\x03\x04\x14\x00\x00\x00\x08\x00README.TXT" + bytes(range(64)) + b"PK\x05\x06"


def b64(data: bytes) -> str:
    text = base64.b64encode(data).decode("ascii")
    return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


HEAD = (
    "From: Dr Jeanne DUPONT <jeanne.dupont@hopital-test.mssante.fr>\n"
    "To: Dr Paul MARTIN <paul.martin@cabinet-test.mssante.fr>\n"
    "Date: Mon, 16 Nov 2026 09:30:00 +0100\n"
)

CDA = """<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <recordTarget><patientRole>
    <id root="1.2.250.1.213.1.4.10" extension="279035121518989"/>
  </patientRole></recordTarget>
  <title>Compte rendu de consultation (fictif)</title>
</ClinicalDocument>
"""

MESSAGES: dict[str, str | bytes] = {}

MESSAGES["plain_ascii"] = HEAD + (
    "Subject: Compte rendu de consultation\n"
    "Message-ID: <cr-0001@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "Cher confrere,\n"
    "\n"
    "Veuillez trouver ci-dessous le compte rendu de la consultation.\n"
    "Bien confraternellement,\n"
    "Dr Jeanne DUPONT\n"
)

MESSAGES["utf8_body_8bit"] = HEAD + (
    "Subject: Resultats d'analyses\n"
    "Message-ID: <labo-0002@labo-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Hémoglobine : 13,5 g/dL — résultat normal.\n"
    "Créatininémie : 80 µmol/L.\n"
)

MESSAGES["rfc2047_q_b"] = (
    "From: =?UTF-8?Q?Dr_H=C3=A9l=C3=A8ne_L=C3=89GER?= <helene.leger@chu-test.mssante.fr>\n"
    "To: =?ISO-8859-1?B?Sm9zZXBoIEzpb24=?= <joseph.leon@pharmacie-test.mssante.fr>\n"
    'Cc: "Secretariat, Cardiologie" <secretariat.cardio@chu-test.mssante.fr>\n'
    "Subject: =?UTF-8?B?T3Jkb25uYW5jZSBkZSBzb3J0aWU=?= =?UTF-8?Q?_n=C2=B0_42?=\n"
    "Date: Tue, 17 Nov 2026 14:05:00 +0100\n"
    "Message-ID: <ordo-42@chu-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Ordonnance de sortie : parac=C3=A9tamol 1 g, 3 fois par jour.\n"
)

MESSAGES["rfc6532_utf8_headers"] = (
    "From: Dr Hélène LÉGER <hélène.léger@chu-test.mssante.fr>\n"
    "To: Zoé Müller <zoe.muller@cabinet-test.mssante.fr>\n"
    "Subject: Résultat d'échographie\n"
    "Date: Wed, 18 Nov 2026 08:00:00 +0100\n"
    "Message-ID: <echo-7@chu-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Échographie abdominale sans particularité.\n"
)

MESSAGES["alternative"] = HEAD + (
    "Subject: Convocation\n"
    "Message-ID: <conv-3@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="alt-boundary-1"\n'
    "\n"
    "This is a multi-part message in MIME format.\n"
    "--alt-boundary-1\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 7bit\n"
    "\n"
    "Rendez-vous le 20 novembre a 10h.\n"
    "--alt-boundary-1\n"
    "Content-Type: text/html; charset=utf-8\n"
    "Content-Transfer-Encoding: 7bit\n"
    "\n"
    "<p>Rendez-vous le 20 novembre a 10h.</p>\n"
    "--alt-boundary-1--\n"
)

MESSAGES["mixed_pdf"] = HEAD + (
    "Subject: Compte rendu operatoire\n"
    "Message-ID: <cro-4@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: multipart/mixed; boundary=mixed-b\n"
    "\n"
    "--mixed-b\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "Compte rendu operatoire en piece jointe.\n"
    "--mixed-b\n"
    'Content-Type: application/pdf; name="CRO_DUPONT.pdf"\n'
    "Content-Transfer-Encoding: base64\n"
    'Content-Disposition: attachment; filename="CRO_DUPONT.pdf"\n'
    "Content-Description: Compte rendu operatoire\n"
    "\n" + b64(FAKE_PDF) + "\n"
    "--mixed-b--\n"
    "epilogue ignored\n"
)

MESSAGES["quoted_printable"] = HEAD + (
    "Subject: Lettre de liaison\n"
    "Message-ID: <liaison-5@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=iso-8859-1\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Patiente sortie le 16/11 apr=E8s une hospitalisation de trois jours pour pn=\n"
    "eumopathie, traitement antibiotique poursuivi =E0 domicile.\n"
)

MESSAGES["nested_related"] = HEAD + (
    "Subject: Bilan avec image\n"
    "Message-ID: <bilan-6@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "--outer\n"
    'Content-Type: multipart/alternative; boundary="middle"\n'
    "\n"
    "--middle\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "Voir l'image ci-jointe.\n"
    "--middle\n"
    'Content-Type: multipart/related; boundary="inner"; type="text/html"\n'
    "\n"
    "--inner\n"
    "Content-Type: text/html; charset=utf-8\n"
    "\n"
    '<p>Voir <img src="cid:radio@hopital-test"></p>\n'
    "--inner\n"
    "Content-Type: image/png\n"
    "Content-Transfer-Encoding: base64\n"
    "Content-ID: <radio@hopital-test>\n"
    "Content-Disposition: inline\n"
    "\n" + b64(FAKE_PNG) + "\n"
    "--inner--\n"
    "--middle--\n"
    "--outer\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "Content-Disposition: attachment; filename=notes.txt\n"
    "\n"
    "Notes complementaires.\n"
    "--outer--\n"
)

INNER_MULTIPART = (
    "From: Laboratoire TEST <labo@labo-test.mssante.fr>\n"
    "To: Dr Jeanne DUPONT <jeanne.dupont@hopital-test.mssante.fr>\n"
    "Subject: Resultats transmis\n"
    "Date: Sun, 15 Nov 2026 18:00:00 +0100\n"
    "Message-ID: <res-inner@labo-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="inner-msg"\n'
    "\n"
    "--inner-msg\n"
    "Content-Type: text/plain\n"
    "\n"
    "Resultats en piece jointe.\n"
    "--inner-msg\n"
    "Content-Type: application/pdf\n"
    "Content-Transfer-Encoding: base64\n"
    "Content-Disposition: attachment; filename=resultats.pdf\n"
    "\n" + b64(FAKE_PDF[:60]) + "\n"
    "--inner-msg--\n"
)

MESSAGES["forwarded_rfc822"] = HEAD + (
    "Subject: Tr: Resultats transmis\n"
    "Message-ID: <fwd-8@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="fwd"\n'
    "\n"
    "--fwd\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "Pour information.\n"
    "--fwd\n"
    "Content-Type: message/rfc822\n"
    "Content-Disposition: attachment\n"
    "\n" + INNER_MULTIPART + "--fwd--\n"
)

MESSAGES["digest"] = HEAD + (
    "Subject: Digest des alertes sanitaires\n"
    "Message-ID: <digest-9@ars-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/digest; boundary="dig"\n'
    "\n"
    "--dig\n"
    "\n"
    "From: ARS TEST <alertes@ars-test.mssante.fr>\n"
    "Subject: Alerte 1\n"
    "\n"
    "Premiere alerte.\n"
    "--dig\n"
    "\n"
    "From: ARS TEST <alertes@ars-test.mssante.fr>\n"
    "Subject: Alerte 2\n"
    "\n"
    "Deuxieme alerte.\n"
    "--dig\n"
    "Content-Type: text/plain\n"
    "\n"
    "Fin du digest.\n"
    "--dig--\n"
)

MESSAGES["rfc2231_filename"] = HEAD + (
    "Subject: Courrier avec nom de fichier accentue\n"
    "Message-ID: <courrier-10@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="r2231"\n'
    "\n"
    "--r2231\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "Courrier joint.\n"
    "--r2231\n"
    "Content-Type: application/pdf;\n"
    " name*0*=utf-8''Lettre%20de%20sortie%20;\n"
    " name*1*=H%C3%A9l%C3%A8ne;\n"
    ' name*2=".pdf"\n'
    "Content-Transfer-Encoding: base64\n"
    "Content-Disposition: attachment;\n"
    " filename*=utf-8''Lettre%20de%20sortie%20H%C3%A9l%C3%A8ne.pdf\n"
    "\n" + b64(FAKE_PDF[:30]) + "\n"
    "--r2231--\n"
)

MESSAGES["group_undisclosed"] = (
    "From: Secretariat <secretariat@cabinet-test.mssante.fr>\n"
    "To: undisclosed-recipients:;\n"
    "Cc: Equipe soins: Infirmier A <ide.a@ehpad-test.mssante.fr>, ide.b@ehpad-test.mssante.fr;,"
    " Dr Paul MARTIN <paul.martin@cabinet-test.mssante.fr>\n"
    "Subject: Fermeture du cabinet\n"
    "Date: Thu, 19 Nov 2026 12:00:00 +0100\n"
    "Message-ID: <fermeture-11@cabinet-test.mssante.fr>\n"
    "\n"
    "Le cabinet sera ferme le 24 decembre.\n"
)

MESSAGES["missing_date_msgid"] = (
    "From: paul.martin@cabinet-test.mssante.fr\n"
    "To: jeanne.dupont@hopital-test.mssante.fr\n"
    "Subject: Sans date\n"
    "\n"
    "Message sans Date ni Message-ID.\n"
)

MESSAGES["folded_headers"] = (
    "From: Dr Jeanne DUPONT\n"
    "  <jeanne.dupont@hopital-test.mssante.fr>\n"
    "To: Dr Paul MARTIN <paul.martin@cabinet-test.mssante.fr>,\n"
    "\tSecretariat <secretariat@cabinet-test.mssante.fr>\n"
    "Subject: Un sujet\n"
    "  replie sur deux lignes\n"
    "Date: Fri, 20 Nov 2026\n"
    " 10:00:00 +0100\n"
    "Message-ID:\n"
    " <replie-12@hopital-test.mssante.fr>\n"
    "Content-Type: text/plain;\n"
    '\tcharset="us-ascii"\n'
    "\n"
    "Corps.\n"
)

MESSAGES["long_header_line"] = HEAD + (
    "Subject: " + "Tres long sujet " * 120 + "\n"
    "X-Long: " + "a" * 5000 + "\n"
    "Message-ID: <long-13@hopital-test.mssante.fr>\n"
    "\n"
    "Corps court.\n"
)

MESSAGES["missing_final_boundary"] = HEAD + (
    "Subject: Boundary final manquant\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="nofinal"\n'
    "\n"
    "--nofinal\n"
    "Content-Type: text/plain\n"
    "\n"
    "Premiere partie.\n"
    "--nofinal\n"
    "Content-Type: text/plain\n"
    "\n"
    "Derniere partie sans fin.\n"
)

MESSAGES["boundary_in_preamble"] = HEAD + (
    "Subject: Boundary dans le preambule\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="pre"\n'
    "\n"
    "Preamble mentioning --pre in the middle of a line.\n"
    "x--pre\n"
    "--pre\n"
    "Content-Type: text/plain\n"
    "\n"
    "Seule partie.\n"
    "--pre--\n"
)

MESSAGES["empty_body"] = HEAD + "Subject: Corps vide\nMessage-ID: <vide-15@x.mssante.fr>\n\n"

MESSAGES["header_only"] = HEAD + "Subject: Sans ligne vide\nMessage-ID: <entete-16@x.mssante.fr>\n"

MESSAGES["content_type_comments"] = HEAD + (
    "Subject: Commentaires\n"
    "MIME-Version: 1.0\n"
    'Content-Type: text (texte) / plain (brut) ; charset = "utf-8" (encodage)\n'
    "Content-Transfer-Encoding: 7bit (rien)\n"
    "\n"
    "Texte.\n"
)

MESSAGES["bad_base64"] = HEAD + (
    "Subject: Base64 invalide\n"
    "MIME-Version: 1.0\n"
    "Content-Type: application/octet-stream\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "SGVsbG8g*** d29ybGQ!\n"
    "QUJD=garbage\n"
)

MESSAGES["unknown_cte"] = HEAD + (
    "Subject: Encodage inconnu\n"
    "MIME-Version: 1.0\n"
    "Content-Type: application/octet-stream; name=fichier.bin\n"
    "Content-Transfer-Encoding: x-uuencode\n"
    "\n"
    "begin 644 fichier.bin\n"
    "#86)C\n"
    "`\n"
    "end\n"
)

MESSAGES["eight_bit_headers_latin1"] = (
    HEAD.encode("ascii")
    + b"Subject: R\xe9sultat urgent\n"
    + b"X-Note: caract\xe8res latin-1\n"
    + b"\n"
    + b"Corps ASCII.\n"
)

DEEP_INNER = (
    "From: Service de radiologie <radio@chu-test.mssante.fr>\n"
    "Subject: Niveau 2\n"
    "Message-ID: <niveau2@chu-test.mssante.fr>\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "Message le plus profond.\n"
)

MESSAGES["nested_rfc822_two_levels"] = HEAD + (
    "Subject: Tr: Tr: Niveau 2\n"
    "Message-ID: <niveau0@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="lvl0"\n'
    "\n"
    "--lvl0\n"
    "Content-Type: text/plain\n"
    "\n"
    "Niveau 0.\n"
    "--lvl0\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "From: Dr Paul MARTIN <paul.martin@cabinet-test.mssante.fr>\n"
    "Subject: Tr: Niveau 2\n"
    "Message-ID: <niveau1@cabinet-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="lvl1"\n'
    "\n"
    "--lvl1\n"
    "Content-Type: text/plain\n"
    "\n"
    "Niveau 1.\n"
    "--lvl1\n"
    "Content-Type: message/rfc822\n"
    "\n" + DEEP_INNER + "--lvl1--\n"
    "--lvl0--\n"
)

MESSAGES["xdm_zip"] = (
    "From: DPI Hopital TEST <dpi@hopital-test.mssante.fr>\n"
    "To: 279035121518989@patient.mssante.fr\n"
    "Subject: Document medical\n"
    "Date: Sat, 21 Nov 2026 07:45:00 +0100\n"
    "Message-ID: <xdm-17@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="xdm"\n'
    "\n"
    "--xdm\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Document au format IHE XDM (fictif), INS 1.2.250.1.213.1.4.10.\n"
    "--xdm\n"
    "Content-Type: application/zip; name=IHE_XDM.zip\n"
    "Content-Transfer-Encoding: base64\n"
    "Content-Disposition: attachment; filename=IHE_XDM.zip\n"
    "\n" + b64(FAKE_ZIP) + "\n"
    "--xdm--\n"
)

MESSAGES["cda_xml"] = HEAD + (
    "Subject: CDA R2 niveau 3\n"
    "Message-ID: <cda-18@hopital-test.mssante.fr>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="cda"\n'
    "\n"
    "--cda\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "Document CDA joint.\n"
    "--cda\n"
    "Content-Type: text/xml; charset=utf-8; name=CR_consultation.xml\n"
    "Content-Disposition: attachment; filename=CR_consultation.xml\n"
    "Content-Language: fr\n"
    "Content-Location: CR_consultation.xml\n"
    "\n" + CDA + "--cda--\n"
)

MESSAGES["no_content_type_mime"] = HEAD + (
    "Subject: MIME-Version sans Content-Type\n"
    "MIME-Version: 1.0\n"
    "\n"
    "Corps par defaut text/plain us-ascii.\n"
)

MESSAGES["garbage_content_type"] = HEAD + (
    "Subject: Content-Type illisible\n"
    "MIME-Version: 1.0\n"
    "Content-Type: n'importe quoi;;; ===\n"
    "\n"
    "Corps.\n"
)

MESSAGES["multipart_no_boundary_param"] = HEAD + (
    "Subject: multipart sans boundary\n"
    "MIME-Version: 1.0\n"
    "Content-Type: multipart/mixed\n"
    "\n"
    "--x\n"
    "Corps.\n"
)

MESSAGES["boundary_not_found"] = HEAD + (
    "Subject: boundary introuvable\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="absent"\n'
    "\n"
    "Aucune partie ici.\n"
)

MESSAGES["reply_with_sender"] = (
    "From: Dr Jeanne DUPONT <jeanne.dupont@hopital-test.mssante.fr>\n"
    "Sender: Secretariat DUPONT <secretariat@hopital-test.mssante.fr>\n"
    "Reply-To: <secretariat@hopital-test.mssante.fr>\n"
    "To: paul.martin@cabinet-test.mssante.fr (Dr Paul MARTIN)\n"
    "Bcc: archive@hopital-test.mssante.fr\n"
    "Subject: Re: Compte rendu de consultation\n"
    "Date: Mon, 16 Nov 2026 11:00:00 +0100\n"
    "In-Reply-To: <cr-0001@hopital-test.mssante.fr>\n"
    "References: <cr-0001@hopital-test.mssante.fr>\n"
    "Message-ID: <re-cr-0001@hopital-test.mssante.fr>\n"
    "\n"
    "Merci.\n"
)

MESSAGES["boundary_with_semicolon"] = HEAD + (
    "Subject: boundary entre guillemets avec ;\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="=_a;b=c_"; charset=x\n'
    "\n"
    "--=_a;b=c_\n"
    "Content-Type: text/plain\n"
    "\n"
    "Une partie.\n"
    "--=_a;b=c_--\n"
)

MESSAGES["empty_multipart_part"] = HEAD + (
    "Subject: partie vide\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="e"\n'
    "\n"
    "--e\n"
    "\n"
    "--e\n"
    "Content-Type: text/plain\n"
    "--e--\n"
)

BARE_LF = (
    "From: Dr Jeanne DUPONT <jeanne.dupont@hopital-test.mssante.fr>\n"
    "To: Dr Paul MARTIN <paul.martin@cabinet-test.mssante.fr>\n"
    "Subject: Fins de ligne LF\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="lf"\n'
    "\n"
    "--lf\n"
    "Content-Type: text/plain\n"
    "\n"
    "Ligne un.\n"
    "Ligne deux.\n"
    "--lf\n"
    "Content-Type: text/plain\n"
    "\n"
    "Autre partie.\n"
    "--lf--\n"
)


def main() -> None:
    for old in HERE.glob("*.eml"):
        old.unlink()
    for name, text in sorted(MESSAGES.items()):
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        (HERE / f"{name}.eml").write_bytes(data.replace(b"\n", b"\r\n"))
    (HERE / "bare_lf.eml").write_bytes(BARE_LF.encode("ascii"))


if __name__ == "__main__":
    main()
